"""Former home of the training-dynamics study: see `keras_localrank.studies.dynamics`.

Kept as an alias so `keras_localrank.dynamics.train_and_evaluate` and friends
keep working; the curve summaries live in `keras_localrank.curves`.
"""

from keras_localrank.studies.dynamics import *  # noqa: F401,F403
from keras_localrank.studies.dynamics import __all__  # noqa: F401
