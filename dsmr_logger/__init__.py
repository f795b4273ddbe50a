"""dsmr-logger: read a smart meter's P1 port and deliver every telegram to DSMR-reader."""

__version__ = "0.1.0"
