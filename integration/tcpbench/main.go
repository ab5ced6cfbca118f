// Command tcpbench measures TCP throughput between two containers.
//
//	tcpbench -listen :5001      # prints "MiB seconds MiB/s" per connection
//	tcpbench -send HOST:5001 -mib 256
//
// The receiver times from the first byte to EOF, so container and VM
// start-up do not count.
package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

func main() {
	listen := flag.String("listen", "", "address to receive on")
	send := flag.String("send", "", "address to send to")
	mib := flag.Int("mib", 256, "MiB to send")
	flag.Parse()
	switch {
	case *listen != "":
		l, err := net.Listen("tcp", *listen)
		if err != nil {
			fail(err)
		}
		fmt.Println("listening")
		for {
			c, err := l.Accept()
			if err != nil {
				fail(err)
			}
			buf := make([]byte, 1<<20)
			var n int64
			var start time.Time
			for {
				k, err := c.Read(buf)
				if k > 0 && n == 0 {
					start = time.Now()
				}
				n += int64(k)
				if err == io.EOF {
					break
				}
				if err != nil {
					fail(err)
				}
			}
			c.Close()
			d := time.Since(start).Seconds()
			fmt.Printf("%.1f MiB %.3f s %.1f MiB/s\n", float64(n)/(1<<20), d, float64(n)/(1<<20)/d)
		}
	case *send != "":
		var c net.Conn
		var err error
		for i := 0; i < 100; i++ {
			if c, err = net.Dial("tcp", *send); err == nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			fail(err)
		}
		buf := make([]byte, 1<<20)
		for i := 0; i < *mib; i++ {
			if _, err := c.Write(buf); err != nil {
				fail(err)
			}
		}
		if err := c.Close(); err != nil {
			fail(err)
		}
	default:
		fmt.Fprintln(os.Stderr, "usage: tcpbench -listen ADDR | -send ADDR [-mib N]")
		os.Exit(2)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "tcpbench:", err)
	os.Exit(1)
}
