"""Warning categories of safenorm (filter them with ``warnings.filterwarnings``)."""


class SafenormWarning(UserWarning):
    """Base class of safenorm's warnings."""


class PrivacyWarning(SafenormWarning):
    """A privacy assumption is not met or cannot be checked (e.g. no public batch size)."""


class ConversionWarning(SafenormWarning):
    """A conversion could not keep every behaviour of the original layer."""
