"""
infra/checker.py -- the answer checker's sandbox.

math-verify can hang inside C code (sympy on a huge exponent, deep nesting), where no Python
timeout reaches it, so calibrl's answer check (its math_equal) runs in a worker process that can
be killed: bounded per check and per step, a failure scores 0 and is counted
(train/reward_failures). Apart because it is process management, not the reward's rules.
"""
import signal
import time

def _verify_worker(check, conn, parent_end):
    import logging
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # warns that its timeouts are off
    parent_end.close()  # so that recv() ends (EOFError) when the trainer exits
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the trainer's handlers: terminate() works,
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # and Ctrl-C is the trainer's to handle
    while True:
        try:
            pred, gt = conn.recv()
        except (EOFError, OSError):  # the trainer is gone (even killed): leave without a word
            return
        try:
            conn.send((check(pred, gt), 0))
        except Exception:
            conn.send((0.0, 1))


MAX_ANSWER_CHARS = 1000  # longer answers are compared as strings only (math-verify: ~3 s per MB)


class Verifier:
    """check(pred, gt) in a worker process, bounded by `timeout` seconds per check and `budget`
    seconds per training step (start_step() resets it). A check that times out or raises scores 0;
    so does an answer longer than MAX_ANSWER_CHARS or one met after the step's budget is spent
    (the caller has already compared the normalised strings). All of them count in `failures`;
    `spent` is the step's checking time. A killed worker is restarted on the next call."""
    def __init__(self, check, timeout=5.0, budget=60.0):
        self.check, self.timeout, self.budget, self.proc = check, timeout, budget, None
        self.failures, self.spent = 0, 0.0

    def start_step(self):
        self.spent = 0.0

    def __call__(self, pred, gt):
        if max(len(pred), len(gt)) > MAX_ANSWER_CHARS or self.spent >= self.budget:
            self.failures += 1
            return 0.0
        t0 = time.time()
        try:
            return self._check(pred, gt)
        finally:
            self.spent += time.time() - t0

    def _check(self, pred, gt):
        import multiprocessing as mp
        if self.proc is None:
            ctx = mp.get_context("fork")  # the child only runs sympy: no torch, no CUDA
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_verify_worker, args=(self.check, child, self.conn),
                                    daemon=True)
            self.proc.start()
            child.close()
        self.conn.send((pred, gt))
        if self.conn.poll(self.timeout):
            value, failed = self.conn.recv()
            self.failures += failed
            return value
        self.proc.kill()
        self.proc.join()
        self.proc, self.failures = None, self.failures + 1
        return 0.0
