// Command dnsload measures name resolution: a nameserver for the tests'
// own names, and a client that resolves many of them through the
// system's resolv.conf, as a program in a container does.
//
//	dnsload -serve 203.0.113.250:53          # answers NAME.load.test A 198.51.100.1, TTL 0
//	dnsload -lookups 700 -parallel 4 -prefix c1
//
// The client prints one JSON line: lookups, failures, seconds and the
// first few errors. Every name is distinct, so no cache answers for the
// path to the nameserver.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

func main() {
	serve := flag.String("serve", "", "answer queries on this UDP address")
	lookups := flag.Int("lookups", 100, "names to resolve")
	parallel := flag.Int("parallel", 4, "lookups at once")
	prefix := flag.String("prefix", "c", "first label of the names")
	flag.Parse()
	if *serve != "" {
		// server returns only when it fails.
		fmt.Fprintln(os.Stderr, "dnsload:", server(*serve))
		os.Exit(1)
	}
	client(*lookups, *parallel, *prefix)
}

// server answers until SIGTERM, then prints how many queries it got.
func server(addr string) error {
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return err
	}
	var n atomic.Int64
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		fmt.Printf("queries %d\n", n.Load())
		os.Exit(0)
	}()
	fmt.Println("serving")
	buf := make([]byte, 1500)
	for {
		k, from, err := pc.ReadFrom(buf)
		if err != nil {
			return err
		}
		n.Add(1)
		var p dnsmessage.Parser
		h, err := p.Start(buf[:k])
		if err != nil {
			continue
		}
		q, err := p.Question()
		if err != nil {
			continue
		}
		b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired})
		b.StartQuestions()
		b.Question(q)
		if q.Type == dnsmessage.TypeA {
			b.StartAnswers()
			b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET}, dnsmessage.AResource{A: [4]byte{198, 51, 100, 1}})
		}
		if msg, err := b.Finish(); err == nil {
			pc.WriteTo(msg, from)
		}
	}
}

type report struct {
	Lookups  int      `json:"lookups"`
	Failures int      `json:"failures"`
	Seconds  float64  `json:"seconds"`
	Errors   []string `json:"errors,omitempty"`
}

func client(lookups, parallel int, prefix string) {
	var (
		mu   sync.Mutex
		rep  = report{Lookups: lookups}
		next atomic.Int64
		wg   sync.WaitGroup
	)
	start := time.Now()
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1))
				if i > lookups {
					return
				}
				name := fmt.Sprintf("%s-%d.load.test", prefix, i)
				addrs, err := net.DefaultResolver.LookupHost(context.Background(), name)
				if err == nil && (len(addrs) != 1 || addrs[0] != "198.51.100.1") {
					err = fmt.Errorf("%s: got %v", name, addrs)
				}
				if err != nil {
					mu.Lock()
					rep.Failures++
					if len(rep.Errors) < 5 {
						rep.Errors = append(rep.Errors, time.Since(start).Round(time.Millisecond).String()+" "+err.Error())
					}
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	rep.Seconds = time.Since(start).Seconds()
	json.NewEncoder(os.Stdout).Encode(rep)
}
