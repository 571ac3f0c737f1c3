"""Floors for the idle scenario: what a connection costs before realtime does its own work.

``accept``: daphne accepting a WebSocket, no Django at all. ``auth``: the same behind realtime's
session authentication (``SessionAuthStack``, the middleware the realtime stack runs), accepting
only a logged-in user. Neither joins a room, sends a frame or tracks presence; the difference
between them and the realtime stack is what realtime's own connection path costs.
"""
