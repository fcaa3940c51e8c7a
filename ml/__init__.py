"""dermq's machine-learning package: labels, safe decoding, model, training, evaluation, serving.

Importing ``ml`` (or ``ml.labels`` / ``ml.images``) pulls in nothing heavy: the API process relies on
that to stay free of torch. Modules that need torch import it themselves.
"""
