"""The teacher server's wire format (`protocol`): the frames that `opd-fast serve-teacher`
(opd_fast.serving) and its client (opd_fast.teachers) exchange. Both import it from here, so
neither layer reaches into the other.

Imports: numpy only, nothing else of opd_fast.
"""
