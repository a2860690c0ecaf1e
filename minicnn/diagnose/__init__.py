"""Events and a run diagnosis: pure functions over a run's trace (``minicnn.load_run``).

    run = load_run("runs/x")
    d = diagnose(run)            # d.verdict, d.decisive_step, d.text, d.events

    thresholds.py   every threshold, named, with the reason and the numbers it came from
    events.py       one rule per event kind, shared by find_events (the whole run) and
                    step_events (one step, for the debugger)
    onset.py        the decisive step: the onset of the outsized move that threw a run off
    story.py        the sentences under a verdict: one step's mechanism, the state after it
    causes.py       the most likely cause of a verdict, its evidence, and the fix as data
    verdict.py      diagnose: the verdict, its decisive step, the mechanism in numbers, the cause
"""
from .causes import CAUSES, Cause
from .events import STEP_EVENTS, Event, Trace, event_summary, find_events, merge_events, overshoot_flags, step_events
from .thresholds import *  # noqa: F401,F403  (the named thresholds, e.g. diagnose.SPIKE_WINDOW)
from .verdict import VERDICTS, Diagnosis, diagnose

__all__ = ["diagnose", "Diagnosis", "VERDICTS", "Cause", "CAUSES", "find_events", "step_events", "merge_events",
           "event_summary", "Event", "Trace", "STEP_EVENTS", "overshoot_flags"]
