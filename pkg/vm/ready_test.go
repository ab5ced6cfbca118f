package vm

import (
	"os"
	"testing"
	"time"
)

// TestWatchReader: the channel closes when create (the pipe's reader)
// goes away, and not while it waits.
func TestWatchReader(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	gone := watchReader(w)
	select {
	case <-gone:
		t.Fatal("reported gone while the reader is open")
	case <-time.After(300 * time.Millisecond):
	}
	r.Close()
	select {
	case <-gone:
	case <-time.After(5 * time.Second):
		t.Fatal("reader closed, not reported")
	}
}

// TestWatchReaderStops: closing the write end (the ready line sent) ends
// the watch without a report.
func TestWatchReaderStops(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	gone := watchReader(w)
	w.Close()
	select {
	case <-gone:
		t.Fatal("reported gone although the reader is open")
	case <-time.After(600 * time.Millisecond):
	}
}
