"""The tritonserver process: launching it (loopback by default, MPS on a GPU) and keeping it
serving (the supervisor restarts model processes that die or hang)."""
