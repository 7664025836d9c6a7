package main

import (
	"fmt"

	"github.com/anishathalye/porcupine"
)

// Op is one client request of a chaos run's history, as the harness records it.
//
// Outcome "ok" means the client got an answer; "unknown" means a write whose answer never
// came (a timeout, a connection lost, no leader): it may have taken effect at any time after
// its call, or never, as etcd's robustness tests treat it. Reads that failed are not recorded.
type Op struct {
	Client  int     `json:"client"`
	Call    int64   `json:"call"`
	Return  int64   `json:"return"`
	Kind    string  `json:"kind"` // put, get, delete, cas, revoke
	Key     string  `json:"key"`
	Value   string  `json:"value,omitempty"`  // put, cas: the value written
	Lease   int64   `json:"lease,omitempty"`  // put: the lease attached; revoke: the lease revoked
	Expect  *string `json:"expect,omitempty"` // cas: the value compared with; absent: the key must not exist
	Outcome string  `json:"outcome"`
	// Answers: a get's (and a failed cas's) read, a delete's count, a cas's branch.
	Found     bool   `json:"found,omitempty"`
	Read      string `json:"read,omitempty"`
	Deleted   int64  `json:"deleted,omitempty"`
	Succeeded bool   `json:"succeeded,omitempty"`
}

// keyState is one key as a linearizable store holds it: absent, or a value and the lease it
// is attached to (0 for none).
type keyState struct {
	Present bool
	Value   string
	Lease   int64
}

func (s keyState) String() string {
	if !s.Present {
		return "absent"
	}
	if s.Lease != 0 {
		return fmt.Sprintf("%q (lease %x)", s.Value, s.Lease)
	}
	return fmt.Sprintf("%q", s.Value)
}

var absent = keyState{}

// step returns the states a key may be in after op, given it was in state; none when op's
// answer is impossible from state.
func step(state keyState, op Op) []keyState {
	unknown := op.Outcome == "unknown"
	either := func(done keyState) []keyState {
		if unknown {
			return []keyState{state, done}
		}
		return []keyState{done}
	}
	switch op.Kind {
	case "put":
		return either(keyState{Present: true, Value: op.Value, Lease: op.Lease})
	case "get":
		if op.Found == state.Present && (!op.Found || op.Read == state.Value) {
			return []keyState{state}
		}
		return nil
	case "delete":
		if !unknown && (op.Deleted == 1) != state.Present {
			return nil
		}
		return either(absent)
	case "revoke":
		// Revoking a lease deletes the key only while it is still attached to it.
		if state.Present && state.Lease == op.Lease {
			return either(absent)
		}
		return []keyState{state}
	case "cas":
		holds := !state.Present
		if op.Expect != nil {
			holds = state.Present && state.Value == *op.Expect
		}
		written := keyState{Present: true, Value: op.Value}
		if unknown {
			if holds {
				return []keyState{state, written}
			}
			return []keyState{state}
		}
		if op.Succeeded != holds {
			return nil
		}
		if holds {
			return []keyState{written}
		}
		// The failure branch reads the key.
		if op.Found == state.Present && (!op.Found || op.Read == state.Value) {
			return []keyState{state}
		}
		return nil
	}
	return nil
}

func describe(op Op) string {
	answer := op.Outcome
	switch {
	case op.Outcome == "unknown":
	case op.Kind == "get" && op.Found:
		answer = fmt.Sprintf("%q", op.Read)
	case op.Kind == "get":
		answer = "absent"
	case op.Kind == "delete":
		answer = fmt.Sprintf("deleted %d", op.Deleted)
	case op.Kind == "cas":
		answer = fmt.Sprintf("succeeded %v", op.Succeeded)
	}
	switch op.Kind {
	case "put":
		return fmt.Sprintf("put(%s, %q, lease %x) -> %s", op.Key, op.Value, op.Lease, answer)
	case "cas":
		expect := "absent"
		if op.Expect != nil {
			expect = fmt.Sprintf("%q", *op.Expect)
		}
		return fmt.Sprintf("cas(%s, %s -> %q) -> %s", op.Key, expect, op.Value, answer)
	case "revoke":
		return fmt.Sprintf("revoke(%x on %s) -> %s", op.Lease, op.Key, answer)
	}
	return fmt.Sprintf("%s(%s) -> %s", op.Kind, op.Key, answer)
}

// kvModel is etcd's key-value store for porcupine: every operation touches one key, so the
// history is checked key by key.
var kvModel = porcupine.NondeterministicModel{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		byKey := map[string][]porcupine.Operation{}
		var keys []string
		for _, o := range history {
			key := o.Input.(Op).Key
			if _, seen := byKey[key]; !seen {
				keys = append(keys, key)
			}
			byKey[key] = append(byKey[key], o)
		}
		parts := make([][]porcupine.Operation, 0, len(keys))
		for _, k := range keys {
			parts = append(parts, byKey[k])
		}
		return parts
	},
	Init: func() []interface{} { return []interface{}{absent} },
	Step: func(state, input, _ interface{}) []interface{} {
		next := step(state.(keyState), input.(Op))
		states := make([]interface{}, len(next))
		for i, s := range next {
			states[i] = s
		}
		return states
	},
	Equal:             func(a, b interface{}) bool { return a.(keyState) == b.(keyState) },
	DescribeOperation: func(input, _ interface{}) string { return describe(input.(Op)) },
	DescribeState:     func(state interface{}) string { return state.(keyState).String() },
}
