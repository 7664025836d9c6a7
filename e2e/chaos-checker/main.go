// chaos-checker checks a chaos run's history for linearizability with porcupine, the checker
// etcd's robustness tests use. It reads the history the harness wrote (JSON), prints one
// line, and exits 0 when the history is linearizable, 1 when it is not (writing porcupine's
// visualization beside the history), 2 when it cannot tell (bad input, or the check timed out).
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"time"

	"github.com/anishathalye/porcupine"
)

type history struct {
	Operations []Op `json:"operations"`
}

// operations turns the recorded requests into porcupine's: a write of unknown outcome may
// take effect at any time after its call, so it never returns.
func operations(h history) []porcupine.Operation {
	ops := make([]porcupine.Operation, 0, len(h.Operations))
	for _, op := range h.Operations {
		ret := op.Return
		if op.Outcome == "unknown" {
			ret = math.MaxInt64
		}
		ops = append(ops, porcupine.Operation{ClientId: op.Client, Input: op, Call: op.Call, Output: nil, Return: ret})
	}
	return ops
}

func check(h history, timeout time.Duration) (porcupine.CheckResult, porcupine.LinearizationInfo) {
	return porcupine.CheckOperationsVerbose(kvModel.ToModel(), operations(h), timeout)
}

func main() {
	path := flag.String("history", "", "the history file a chaos run wrote")
	timeout := flag.Duration("timeout", time.Minute, "how long the check may take")
	visualization := flag.String("visualization", "", "where to write porcupine's HTML on a violation (default: beside the history)")
	flag.Parse()
	if *path == "" {
		fmt.Fprintln(os.Stderr, "chaos-checker: --history is required")
		os.Exit(2)
	}
	raw, err := os.ReadFile(*path)
	if err != nil {
		fmt.Fprintf(os.Stderr, "chaos-checker: %v\n", err)
		os.Exit(2)
	}
	var h history
	if err := json.Unmarshal(raw, &h); err != nil {
		fmt.Fprintf(os.Stderr, "chaos-checker: %s: %v\n", *path, err)
		os.Exit(2)
	}
	result, info := check(h, *timeout)
	switch result {
	case porcupine.Ok:
		fmt.Printf("linearizable: %d operations\n", len(h.Operations))
	case porcupine.Illegal:
		out := *visualization
		if out == "" {
			out = *path + ".html"
		}
		if err := porcupine.VisualizePath(kvModel.ToModel(), info, out); err != nil {
			fmt.Fprintf(os.Stderr, "chaos-checker: writing %s: %v\n", out, err)
		}
		fmt.Printf("not linearizable: %d operations, see %s\n", len(h.Operations), out)
		os.Exit(1)
	default:
		fmt.Printf("unknown: the check of %d operations did not finish in %s\n", len(h.Operations), *timeout)
		os.Exit(2)
	}
}
