"""sipwire test suite: real sockets, real worker processes, real sipp."""
