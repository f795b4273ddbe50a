"""History brought in from energy clouds (``dsmr-logger import <cloud>``): each cloud's client
turns its readings into DSMR 5 telegrams (``telegram.build``) and hands them to the backfill
machinery, so DSMR-reader and the archive receive them like any recorded telegram."""
