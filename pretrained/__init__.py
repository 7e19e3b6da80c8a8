"""Released checkpoints as anyloom runs: import a Chameleon, Emu3, Llama or Anole checkpoint into a run directory
that ``anyloom.load``, ``make generate`` and training (as an initialisation) accept."""
