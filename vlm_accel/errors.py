"""Exceptions with a meaning callers may act on."""


class MethodNotApplicable(ValueError):
    """A method cannot act on this model (e.g. it needs a CLS token the vision tower lacks, or a guide model).

    A ``ValueError`` subclass, so callers that only want a clear error need nothing special; the test matrix and
    ``vlm-accel compare`` skip a method/model pair that raises it.
    """
