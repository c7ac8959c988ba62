"""``python -m bench.compare``: what each backend costs and what it reaches, on this machine.

Modules:
- ``compare``  : the command (orchestrates one worker subprocess per backend x device x model,
                 then writes the table, ``bench.json`` and ``bench.png``);
- ``worker``   : ``python -m bench.speed.worker`` -- measures ONE (backend, device, model) in its own
                 process (so peak memory and thread pools are its own) and prints one JSON line;
- ``backends`` : the five backends behind one small interface (put data, train an epoch,
                 evaluate), built on each stack's public API;
- ``parity``   : quick in-process checks that the JAX port computes the specs' function
                 (``python -m bench.speed.parity --json``).
"""
