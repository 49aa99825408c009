"""Images: loading and normalising input images (``images``) and ratio snapping, pad and crop
back (``ratio``)."""
