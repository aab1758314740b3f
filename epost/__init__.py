"""epost: a mail transfer agent on Twisted."""
