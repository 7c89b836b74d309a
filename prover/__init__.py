"""Lean 4 theorem proving on the shared MoE core: backends, defences, generators, batch runs."""
