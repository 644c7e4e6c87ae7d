"""spoolq: a per-machine message queue manager whose database is the filesystem.

    import spoolq
    client = spoolq.open("/var/spool/spoolq")
    receipt = client.send("mail", param1="alice@example.com")
"""

from .client import Client, Receipt, open
from .errors import SpoolqError
from .ids import MessageRef
from .model import AdminState, Message, QueueConfig, State
from .persistent import Fail, Job, Retry, run_worker, worker

__version__ = "0.1.0"
__all__ = ["AdminState", "Client", "Fail", "Job", "Message", "MessageRef", "QueueConfig", "Receipt", "Retry",
           "SpoolqError", "State", "__version__", "open", "run_worker", "worker"]
