"""Layer 1, config: the typed schema every recipe is checked against, and pure validation of its values.

It imports nothing from moetrain: every other layer may import it, and it never reads a file, a model or a
process group (checks that need those run at the entry, :mod:`moetrain.interop.entry`).
"""

from moetrain.config.schema import *  # noqa: F403
