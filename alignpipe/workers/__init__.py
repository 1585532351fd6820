"""What runs inside Ray workers, one module per stage; the Prefect tasks in `tasks/` drive them.

Nothing here imports Prefect: a Ray worker imports the module of the function it runs, in a fresh process, and
Prefect alone costs ~1.4 s of every worker's start-up on 2 cores.
"""
