"""`conjure merge`: models of one family merged tensor by tensor (LERP, SLERP, add-difference, TIES, DARE).

formulas.py holds the maths on tensors, sources.py reads the models (lazily from diffusers folders), merge.py runs a
merge and writes a diffusers folder or a single-file checkpoint, command.py is the CLI.
"""

METHODS = ("lerp", "slerp", "add-difference", "ties", "dare")  # here, so that the CLI's parser imports no torch
