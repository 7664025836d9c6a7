package main

import (
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
)

func text(s string) *string { return &s }

func verdict(t *testing.T, ops ...Op) porcupine.CheckResult {
	t.Helper()
	result, _ := check(history{Operations: ops}, 10*time.Second)
	return result
}

func TestAReadOfAValueOverwrittenBeforeItWasAskedIsAViolation(t *testing.T) {
	// put a=1 acknowledged, put a=2 acknowledged, then a read that starts later sees 1.
	got := verdict(t,
		Op{Client: 0, Call: 0, Return: 10, Kind: "put", Key: "a", Value: "1", Outcome: "ok"},
		Op{Client: 0, Call: 20, Return: 30, Kind: "put", Key: "a", Value: "2", Outcome: "ok"},
		Op{Client: 1, Call: 40, Return: 50, Kind: "get", Key: "a", Found: true, Read: "1", Outcome: "ok"},
	)
	if got != porcupine.Illegal {
		t.Fatalf("a stale read passed: %v", got)
	}
}

func TestAReadConcurrentWithAWriteMaySeeEitherValue(t *testing.T) {
	for _, read := range []string{"1", "2"} {
		got := verdict(t,
			Op{Client: 0, Call: 0, Return: 10, Kind: "put", Key: "a", Value: "1", Outcome: "ok"},
			Op{Client: 0, Call: 20, Return: 60, Kind: "put", Key: "a", Value: "2", Outcome: "ok"},
			Op{Client: 1, Call: 30, Return: 50, Kind: "get", Key: "a", Found: true, Read: read, Outcome: "ok"},
		)
		if got != porcupine.Ok {
			t.Fatalf("reading %s during the write: %v", read, got)
		}
	}
}

func TestAWriteOfUnknownOutcomeMayTakeEffectLaterOrNever(t *testing.T) {
	unknown := Op{Client: 0, Call: 0, Return: -1, Kind: "put", Key: "a", Value: "1", Outcome: "unknown"}
	seenLate := Op{Client: 1, Call: 100, Return: 110, Kind: "get", Key: "a", Found: true, Read: "1", Outcome: "ok"}
	never := Op{Client: 1, Call: 200, Return: 210, Kind: "get", Key: "a", Outcome: "ok"}
	if got := verdict(t, unknown, never); got != porcupine.Ok {
		t.Fatalf("never applied: %v", got)
	}
	if got := verdict(t, unknown, seenLate); got != porcupine.Ok {
		t.Fatalf("applied late: %v", got)
	}
	// But once seen, it cannot be unseen.
	if got := verdict(t, unknown, seenLate, never); got != porcupine.Illegal {
		t.Fatalf("seen then gone: %v", got)
	}
}

func TestCompareAndSwapLeasesAndDeletes(t *testing.T) {
	got := verdict(t,
		Op{Call: 0, Return: 1, Kind: "cas", Key: "k", Value: "x", Outcome: "ok", Succeeded: true},
		Op{Call: 2, Return: 3, Kind: "cas", Key: "k", Expect: text("y"), Value: "z", Outcome: "ok", Found: true, Read: "x"},
		Op{Call: 4, Return: 5, Kind: "put", Key: "k", Value: "l", Lease: 7, Outcome: "ok"},
		Op{Call: 6, Return: 7, Kind: "revoke", Key: "k", Lease: 8, Outcome: "ok"},
		Op{Call: 8, Return: 9, Kind: "get", Key: "k", Found: true, Read: "l", Outcome: "ok"},
		Op{Call: 10, Return: 11, Kind: "revoke", Key: "k", Lease: 7, Outcome: "ok"},
		Op{Call: 12, Return: 13, Kind: "delete", Key: "k", Deleted: 0, Outcome: "ok"},
	)
	if got != porcupine.Ok {
		t.Fatalf("a legal history failed: %v", got)
	}
	if got := verdict(t,
		Op{Call: 0, Return: 1, Kind: "put", Key: "k", Value: "l", Lease: 7, Outcome: "ok"},
		Op{Call: 2, Return: 3, Kind: "revoke", Key: "k", Lease: 7, Outcome: "ok"},
		Op{Call: 4, Return: 5, Kind: "get", Key: "k", Found: true, Read: "l", Outcome: "ok"},
	); got != porcupine.Illegal {
		t.Fatalf("a key outliving its revoked lease passed: %v", got)
	}
}
