"""What tests share: harnesses, fakes at the network boundary, and test data builders.

Test modules import from here (``tests.support.<module>``), never from one another, so any
test file can be run, moved or deleted alone (tests/test_support.py checks it).
"""
