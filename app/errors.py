"""The error every service raises for a problem the user can fix."""


class ChatError(ValueError):
    """A problem the user can fix; the message is worded to be shown as is."""
