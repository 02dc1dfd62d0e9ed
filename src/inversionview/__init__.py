"""inversionview: read the information held in a neural network's activations (InversionView, Huang et al. 2024).

>>> from inversionview import InversionView
>>> iv = InversionView.load("shipped:counting")
>>> iv.query("vvzccvczvvvzvcvc|v:8", site="a1.0", position=":").show()
"""

from .errors import UserError
from .preimage import Preimage, Sample
from .probed import ProbedModel
from .run import InversionView
from .sites import Site, parse_site

__all__ = ["InversionView", "Preimage", "ProbedModel", "Sample", "Site", "UserError", "parse_site"]
__version__ = "0.1.0"
