"""What the publisher and the device must agree on byte for byte.

Packet layouts, the manifest model and its canonical signed bytes, the manifest JSON Schema,
group-address derivation, FEC parameter derivation and the limits both sides enforce.  Nothing
here touches sockets, files, clocks or cryptography: those belong to the two sides.
"""
