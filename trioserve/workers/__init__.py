"""Processes (layer 6): the supervisor, worker processes and their messages, reload, serving until
a signal.
"""
