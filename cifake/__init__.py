"""The user-facing layer over the three stacks: console commands (``cifake.cli``), the
choice of stack for a run directory (``cifake.stacks``) and the local web page
(``cifake.demo``). It imports the stacks; no stack imports it."""
