"""bnlab: reproduce, diagnose and explain batch normalization.

The library is split one concept per module:

- ``bnlab.data``: real MNIST / Fashion-MNIST, verified by sha256.
- ``bnlab.conventions``: BN hyper-parameter conventions of each framework.
- ``bnlab.models``: the seed's MLP with its normalization placements.
- ``bnlab.backprop``: the MLP's training step (forward, loss, backward) written out.
- ``bnlab.train``: the training loop with the seed's semantics.
- ``bnlab.experiments``: presets (every program in the seed) and sweeps.
- ``bnlab.report``: statistics, plots and the HTML report.
- ``bnlab.doctor``: finds batch-norm misuse in a user's model.
- ``bnlab.cli``: the ``bnlab`` command, a thin layer over the above.
"""

__version__ = "0.1.0"
