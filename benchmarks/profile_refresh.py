"""How long the chat app's idle re-measurement of a drifted profile holds the CPU, and how soon a
reply started meanwhile stops it: one full `measure_profile()` timed, then measurements stopped
(their cancel event set) at several delays, each timed from the set to the thread's end. Prints
a table; nothing is cached (measure_profile, not load_profile).

    python benchmarks/profile_refresh.py [--delays 0.5,1.5,3,5]
"""

from __future__ import annotations

import argparse
import threading
import time


def stop_after(delay_s: float) -> tuple[float, str]:
    """(seconds from cancel to the measurement's end, the step it was in)."""
    from moechat.backends.plan import hardware_profile as hp

    cancel, steps, outcome = threading.Event(), [], []

    def measure() -> None:
        try:
            hp.measure_profile(progress=steps.append, cancel=cancel)
            outcome.append("finished")
        except hp.MeasureCancelled:
            outcome.append("stopped")

    thread = threading.Thread(target=measure)
    thread.start()
    time.sleep(delay_s)
    t0 = time.perf_counter()
    cancel.set()
    thread.join()
    return time.perf_counter() - t0, f"{steps[-1] if steps else 'start'} ({outcome[0]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", default="0.5,1.5,3,5", help="seconds into a measurement to stop it")
    args = parser.parse_args()

    import psutil

    from moechat.backends.plan import hardware_profile as hp

    print(f"{psutil.cpu_count(logical=False)} physical cores · load average "
          f"{psutil.getloadavg()[0]:.1f} at the start")
    t0 = time.perf_counter()
    hp.measure_profile()
    print(f"\nfull measurement: {time.perf_counter() - t0:.1f} s\n")
    print("| stopped after | stop took | in step |")
    print("|---|---|---|")
    for delay in (float(d) for d in args.delays.split(",")):
        took, step = stop_after(delay)
        print(f"| {delay:.1f} s | {took:.2f} s | {step} |", flush=True)


if __name__ == "__main__":
    main()
