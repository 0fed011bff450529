"""pgguard's state database as a whole: who may reach it, and how it is set up.

``separation`` checks at start-up that the upstream role (what agents act as) cannot reach the
state; ``setup`` builds the SQL that ``pgguard state init`` prints or applies.
"""
