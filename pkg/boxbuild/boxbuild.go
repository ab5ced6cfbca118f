// Package boxbuild turns a `kiwi-shim boxbuild` command line, which takes
// the same options as KIWI's boxbuild plugin, into the OCI bundle of a
// kiwi box container that runs `kiwi-ng system build`.
package boxbuild
