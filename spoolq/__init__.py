"""spoolq: a per-machine message queue manager whose database is the filesystem.

    import spoolq
    client = spoolq.open("/var/spool/spoolq")
    receipt = client.send("mail", param1="alice@example.com")
"""

from .client import Client, Receipt, open
from .errors import SpoolqError
from .ids import MessageRef
from .model import AdminState, Message, QueueConfig, State

__version__ = "0.1.0"
__all__ = ["AdminState", "Client", "Message", "MessageRef", "QueueConfig", "Receipt", "SpoolqError",
           "State", "__version__", "open"]
