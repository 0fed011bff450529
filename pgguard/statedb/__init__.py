"""pgguard's state database as a whole: who may reach it, and how it is set up.

``separation`` judges whether the upstream role (what agents act as) can reach the state, and
``probe`` asks the servers for the facts it judges, at every start; ``setup`` builds the SQL that
``pgguard state init`` prints, and ``apply`` runs it.
"""
