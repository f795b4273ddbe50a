"""Being watched and repaired: status, spool tools."""
