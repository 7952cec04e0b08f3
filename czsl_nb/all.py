"""Import every czsl_nb module, so that every method is registered (hand-written, like fastcore.all).

No list to keep up to date: `czsl_nb.methods.list_methods` walks the package and reads the
`czsl_nb.methods` entry points of installed packages."""
from .methods import list_methods

list_methods()
