"""Transport: one interface for control messages and bulk Arrow data (POSIX mq + /dev/shm
on one host, TCP across hosts, and a simulated twin). Arrives with the transport issue."""
