"""skybot-cleanup: scheduled housekeeping for the SkyBot Inbox database."""

__version__ = "0.1.0"
