"""Where bytes come from: the port, frame assembly, CRC, and the meter simulator."""
