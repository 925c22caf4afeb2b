"""vmft: fault-tolerant virtual machines on QEMU record/replay.

A primary QEMU records every non-deterministic input into a replay log; the log
travels over a TCP log channel to a backup QEMU that replays it in lock-step
(Scales, Nelson, Venkitachalam, "The Design of a Practical System for
Fault-Tolerant Virtual Machines", 2010).
"""

__version__ = "0.1.0"
