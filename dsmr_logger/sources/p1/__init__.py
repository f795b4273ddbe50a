"""A P1 port: open it (``port``), read it forever (``reader``), decrypt 0xDB frames when keyed
(``decrypt``), and cut the byte stream into CRC-checked telegrams (``framing`` + ``crc``)."""
