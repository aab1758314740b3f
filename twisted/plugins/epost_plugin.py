"""twistd plugin: `twistd epost`. Import-light on purpose: twistd scans it."""

from twisted.application.service import ServiceMaker

epost = ServiceMaker(
    "epost",
    "epost.tap",
    "epost mail transfer agent (SMTP relay, submission, local Maildir delivery)",
    "epost",
)
