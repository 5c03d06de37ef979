from specedge_jax.engine._engine import *  # noqa
from specedge_jax.engine._engine import _bucket  # noqa
