"""Stand-ins for the parts of the Slicer application that the ``slicer-core`` wheel lacks
(``qt``, ``slicer.i18n``, ``slicer.parameterNodeWrapper``, ``slicer.ScriptedLoadableModule``),
so that ``ARENASegmentation.py`` imports in plain Python for the tests. Only the module's
template base classes come from here; MRML, ``slicer.util`` and the Logic's work are real.
Installed only where the real module is absent (inside Slicer nothing is replaced).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
import unittest


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def _tr(text):
    return text


def _translate(context, text):
    return text


class Choice:
    def __init__(self, choices):
        self.choices = choices


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


def parameterNodeWrapper(cls):
    """The real wrapper turns the annotated fields into parameter-node properties; here the class
    only keeps the node it wraps."""

    def __init__(self, parameterNode=None):
        self.parameterNode = parameterNode

    cls.__init__ = __init__
    return cls


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        pass

    def moduleName(self):
        return type(self).__name__.removesuffix("Logic")

    def getParameterNode(self):
        """The module's singleton vtkMRMLScriptedModuleNode in slicer.mrmlScene (as Slicer's)."""
        import slicer

        node = slicer.mrmlScene.GetSingletonNode(self.moduleName(), "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName())
            node.SetName(self.moduleName())
            node.SetAttribute("ModuleName", self.moduleName())
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=0):
        logging.info(message)


def install() -> None:
    """Put the stand-ins in ``sys.modules`` where the real modules cannot be imported."""
    import slicer

    stand_ins = {
        "qt": _module("qt"),
        "slicer.i18n": _module("slicer.i18n", tr=_tr, translate=_translate),
        "slicer.parameterNodeWrapper": _module("slicer.parameterNodeWrapper", Choice=Choice,
                                               WithinRange=WithinRange, parameterNodeWrapper=parameterNodeWrapper),
        "slicer.ScriptedLoadableModule": _module(
            "slicer.ScriptedLoadableModule", ScriptedLoadableModule=ScriptedLoadableModule,
            ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
            ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
            ScriptedLoadableModuleTest=ScriptedLoadableModuleTest,
            __all__=["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                     "ScriptedLoadableModuleTest"]),
    }
    for name, module in stand_ins.items():
        if name in sys.modules:
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            sys.modules[name] = module
            if name.startswith("slicer."):
                setattr(slicer, name.split(".", 1)[1], module)
