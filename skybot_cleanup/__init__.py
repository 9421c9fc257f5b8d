"""skybot-cleanup: scheduled housekeeping for the SkyBot Inbox database."""

__version__ = "0.2.0"
