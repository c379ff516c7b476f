"""Does a stream that waits on another process's interprocess CUDA event hang if that process is killed?

    python3 benchmarks/cuda_ipc_event_probe.py      # on a GPU machine; about 60 s

A producer process queues a 4 s kernel and records an interprocess event after it (case A), or
records it only 2 s after this process issued its wait (case B); this process opens the event's
handle, makes a stream of its own wait for it, queues a small kernel after the wait, and kills the
producer after 1 s. Case C is the order a design would use: the handle is opened first, then the
producer queues the kernel, records and says so, and only then this process waits (C2: the same
event recorded a second time, as every step would). It prints what each side's ``query()`` says and when its own stream's work is
done. Results: benchmarks/RESULTS_GPU.md (issue 14, third round).
"""
import os
import signal
import time

import torch
import torch.multiprocessing as mp


def producer(q, record_late):
    torch.cuda.init()
    s = torch.cuda.Stream()
    e = torch.cuda.Event(interprocess=True)
    t0 = time.time()
    with torch.cuda.stream(s):
        torch.cuda._sleep(int(2e9 * 4))  # ~4 s of GPU time at 2 GHz
        if not record_late:
            e.record(s)
    q.put((e.ipc_handle(), e.query(), time.time() - t0))
    if record_late:
        time.sleep(2.0)
        e.record(s)
    time.sleep(60)


def wait_then_work(s, e):
    """Make stream ``s`` wait for event ``e`` and queue a small kernel after it; its done-event."""
    s.wait_event(e)
    f = torch.cuda.Event()
    with torch.cuda.stream(s):
        torch.ones(1, device="cuda").add_(1)
    f.record(s)
    return f


def kill_and_watch(name, p, e, f):
    """Kill the producer, then see whether our stream's work (event ``f``) gets done within 15 s."""
    print(f"{name}: before kill: ours={e.query()}, our stream done={f.query()}", flush=True)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    tk = time.time()
    done = None
    while time.time() - tk < 15:
        try:
            if f.query():
                done = time.time() - tk
                break
        except Exception as exc:
            print(f"{name}: error {exc!r}", flush=True)
            break
        time.sleep(0.01)
    print(f"{name}: after SIGKILL: our stream's work done after {done} s (None: not in 15 s)", flush=True)


def producer_after_open(q, opened, rounds):
    torch.cuda.init()
    s = torch.cuda.Stream()
    e = torch.cuda.Event(interprocess=True)
    e.record(s)  # an event must exist (be recorded once) before its handle can be taken
    e.synchronize()
    q.put((e.ipc_handle(), e.query(), 0.0))
    for _ in range(rounds):
        opened.get(timeout=60)
        with torch.cuda.stream(s):
            torch.cuda._sleep(int(2e9 * 4))
            e.record(s)
        q.put(("recorded", e.query()))
    time.sleep(60)


def case_open_first(name, rounds):
    """The handle opened before the record; each round: the producer records after a 4 s kernel,
    then this process waits; the last round kills the producer 1 s after the wait."""
    ctx = mp.get_context("spawn")
    q, opened = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=producer_after_open, args=(q, opened, rounds))
    p.start()
    handle, _, _ = q.get(timeout=60)
    e = torch.cuda.Event.from_ipc_handle(torch.device("cuda", 0), handle)
    s = torch.cuda.Stream()
    for r in range(rounds):
        opened.put(True)
        _, own_query = q.get(timeout=60)
        t0 = time.time()
        f = wait_then_work(s, e)
        print(f"{name} round {r}: producer's query after record={own_query}; ours={e.query()}, "
              f"our stream done={f.query()}", flush=True)
        if r < rounds - 1:
            f.synchronize()
            print(f"{name} round {r}: our stream done after {time.time() - t0:.2f} s (4 s if it waited)", flush=True)
    time.sleep(1.0)
    kill_and_watch(name, p, e, f)


def case(name, record_late, kill_after_s):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=producer, args=(q, record_late))
    p.start()
    handle, own_query, launch_s = q.get(timeout=60)
    e = torch.cuda.Event.from_ipc_handle(torch.device("cuda", 0), handle)
    s = torch.cuda.Stream()
    f = wait_then_work(s, e)
    print(f"{name}: producer's own query after record={own_query} (launch {launch_s:.3f}s); ours={e.query()}, "
          f"our stream done={f.query()}", flush=True)
    time.sleep(kill_after_s)
    kill_and_watch(name, p, e, f)


if __name__ == "__main__":
    case("A producer killed 1 s into a 4 s kernel it recorded after", False, 1.0)
    case("B our wait issued before the producer records", True, 1.0)
    case_open_first("C opened before the record", 2)
    print("probe done", flush=True)
