module github.com/kiwi-shim/kiwi-shim

go 1.26.0

require (
	github.com/BurntSushi/toml v1.6.0
	github.com/urfave/cli v1.22.17
	golang.org/x/sys v0.50.0
)

require (
	github.com/cpuguy83/go-md2man/v2 v2.0.7 // indirect
	github.com/creack/pty v1.1.24 // indirect
	github.com/opencontainers/runtime-spec v1.3.0 // indirect
	github.com/russross/blackfriday/v2 v2.1.0 // indirect
)
