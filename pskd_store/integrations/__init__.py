"""PS-KD inside training loops that another library drives.

``lightning``: a callback for PyTorch Lightning's ``Trainer``; ``transformers``: a
``Trainer`` for Hugging Face's sequence classification. Both keep the store's guarantees
(exact targets, resume, several processes, integrity) through :class:`StoreSession`.
Each imports its library on use: ``pip install -e ".[lightning]"`` or ``".[transformers]"``.
"""
