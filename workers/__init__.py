"""Worker processes: each reports facts to the broker and obeys its commands; none decides."""
