"""`blindfold demo`: the whole topology on loopback with throwaway certificates."""
