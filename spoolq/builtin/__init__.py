"""The scripts of spoolq's built-in queues (``webhook``), run as queue scripts."""
